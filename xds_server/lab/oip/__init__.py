"""The Open Inference Protocol (KServe v2) for the lab's model servers: `v2/` holds the
code `hack/gen-protos.sh` generates from protos/xds_server/lab/oip/v2/ (never edit it)."""
