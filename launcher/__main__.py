"""`python -m launcher` is the same as the `ddplaunch` command."""

from cli import main

main()
