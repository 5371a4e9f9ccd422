"""``python -m chassis`` is the ``chassis`` command."""

from chassis.cli import main

main()
