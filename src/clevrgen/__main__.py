from clevrgen.cli import main

main()
