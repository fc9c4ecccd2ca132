"""Run configurations (YAML), a package only so that the files ship with kepo: the demo reads
`configs/demo/*.yaml` from the installed package, so `kepo demo` works from any directory."""
