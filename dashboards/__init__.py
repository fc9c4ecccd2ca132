"""Named SQL over a run's DuckDB tables, one `NAME.sql` file each (a package only so that the
files ship with kepo; `kepo.queries` reads them). Run one with `kepo sql --query NAME`; a query
that takes parameters names them as `$name` (`kepo sql --query NAME --param name=VALUE`)."""
