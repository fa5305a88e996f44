"""placeholder until the diffusion core lands"""
HELP = "not yet available"
EXAMPLES = ""
def denoise_strip() -> None:
    raise SystemExit("not yet available")
