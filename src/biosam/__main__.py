from biosam.cli.main import main

main()
