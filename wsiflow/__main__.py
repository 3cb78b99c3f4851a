from wsiflow.cli.app import main

main()
