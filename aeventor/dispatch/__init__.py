"""The dispatch core: a pure state machine (``_state``) and the loop that carries it out."""
