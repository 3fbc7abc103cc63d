"""The one project image every component runs on (built from the repository; see docs/deploy.md).

It holds the `unipinrec` package with the pinned stack, and the repository's `feature_repo/`
and `serving/` folders, so components install nothing at run time. Pin it by digest in
production (`registry.example.com/unipinrec/pipeline@sha256:...`), or set another image when
compiling: `unipinrec pipeline compile --image REF`.
"""
PROJECT_IMAGE = "registry.example.com/unipinrec/pipeline:0.1.0"
