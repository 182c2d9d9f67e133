"""`python -m tvm_hybrid` is the `tvm-hybrid` command."""

from .cli import main

main()
