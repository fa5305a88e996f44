"""placeholder until the diffusion core lands"""
HELP = "not yet available"
EXAMPLES = ""
def train() -> None:
    raise SystemExit("not yet available")
