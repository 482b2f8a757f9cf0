"""The RPC gateway: signatures, parameter parsing, envelopes and the action table."""
