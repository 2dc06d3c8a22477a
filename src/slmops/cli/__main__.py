"""python -m slmops.cli"""

from slmops.cli import main

main()
