from llmux_extproc.cli import main

main()
