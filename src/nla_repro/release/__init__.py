"""Publishing: model cards (`cards`), RELEASE_CALIBRATION.md (`calibration`), and staging and
pushing the AV, AR and SAE repos to the Hugging Face Hub (`publish`: `release`, `preflight`,
`stage`, `push`)."""
