"""`python -m loralag.cli`: the same command line as `loralag`."""

from loralag.cli import main

if __name__ == "__main__":  # pragma: no cover
    main()
