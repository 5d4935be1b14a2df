"""The ``logitcache`` command line: thin click commands over the library."""

import click


@click.group()
def main() -> None:
    """Distill language models from an offline teacher-logit cache."""


if __name__ == "__main__":
    main()
