"""One module per benchmark measure. `common` starts the child runs and reads them."""
