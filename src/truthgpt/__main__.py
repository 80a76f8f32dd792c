from truthgpt.cli import main

raise SystemExit(main())
