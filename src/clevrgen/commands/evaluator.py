import typer
app = typer.Typer(help="The judge.", no_args_is_help=True)
