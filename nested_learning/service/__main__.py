from nested_learning.service import main

raise SystemExit(main())
