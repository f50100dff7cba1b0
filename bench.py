"""tokenbench's command line: `bench list`, `bench run`, ... (see `bench --help`)."""

from __future__ import annotations

import click

import methods


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Compare token-reduction methods for Vision Transformers on equal terms."""


@cli.command("list")
def list_command() -> None:
    """The registered methods with their options and defaults."""
    for name in methods.list_methods():
        spec = methods.lookup(name)
        click.echo(f"{name}: {spec.summary}")
        for option, default in spec.defaults().items():
            click.echo(f"    {option} = {default!r}")


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
