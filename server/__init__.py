"""The OpenAI-compatible HTTP front door: routes, request parsing, response rendering, HTTP errors, settings."""
