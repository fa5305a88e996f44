"""placeholder until the diffusion core lands"""
HELP = "not yet available"
EXAMPLES = ""
def sample() -> None:
    raise SystemExit("not yet available")
