"""``python -m shimmy``: the same as the ``shimmy`` command."""

from shimmy.cli import main

if __name__ == "__main__":
    main()
