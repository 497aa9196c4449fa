"""One module per benchmark measure; `common` starts and reads the child runs."""
