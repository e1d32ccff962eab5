"""`python -m cli`: the same as the `meshchat` console script."""

from cli.main import main

main()
