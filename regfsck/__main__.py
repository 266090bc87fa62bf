"""Allow `python -m regfsck`."""

from regfsck.cli.app import main

if __name__ == "__main__":
    main()
