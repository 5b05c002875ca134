"""Live speech without the network: VAD, the streaming decoder, the session."""
