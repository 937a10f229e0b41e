from nested_learning.cli import main

raise SystemExit(main())
