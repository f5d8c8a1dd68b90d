"""``python -m samora_components``: see :mod:`samora_components.apps.cli`."""

from samora_components.apps.cli import main

if __name__ == "__main__":
    main()
