from shimmy.engine.worker.main import main

if __name__ == "__main__":
    main()
