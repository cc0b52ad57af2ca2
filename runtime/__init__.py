"""nccompile's runtime: executing compression recipes on built models (torch side)."""
