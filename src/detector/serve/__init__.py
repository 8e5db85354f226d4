"""The detection service (``serve.py``): LitServe API, upload checks, the static page."""
