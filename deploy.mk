# Deployment tooling and checks (Dockerfile, manifests/, helm/): included by the Makefile.
.PHONY: deploy-tools
deploy-tools:
