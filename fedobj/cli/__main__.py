"""``python -m fedobj.cli``: the same command line as the ``fedobj`` script."""

from fedobj.cli import main

main()
