from tokalign.cli.app import main

main()
