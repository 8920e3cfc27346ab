"""Training: the shared infrastructure (`run`: run folder, checkpoints and retention, resume,
RNG, the step loop, curves, provenance sidecars) and the SFT trainer of the AV and AR (`sft`).
The SAE trainer (`nla_repro.sae.training`) uses the same infrastructure."""
