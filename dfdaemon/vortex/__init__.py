"""Vortex: current Dragonfly's TCP piece protocol (upstream port 4005), codec, parent server and child client."""
