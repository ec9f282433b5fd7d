"""HTTP routes: thin functions that parse the form, validate, await the engine, and render."""
