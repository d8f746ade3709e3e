from spo.cli.main import main

raise SystemExit(main())
