"""The browser editor: a FastAPI server, per-tab sessions, background jobs and a static page."""
