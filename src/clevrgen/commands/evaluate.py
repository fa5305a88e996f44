"""placeholder until the diffusion core lands"""
HELP = "not yet available"
EXAMPLES = ""
def evaluate() -> None:
    raise SystemExit("not yet available")
