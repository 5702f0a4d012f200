"""Generated protobuf and gRPC modules; regenerate with scripts/gen_proto.py."""
