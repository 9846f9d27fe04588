from tokalign.cli.app import main

if __name__ == "__main__":  # importing this module (tooling, multiprocessing) must not run the CLI
    main()
