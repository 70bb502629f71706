"""Optional integrations with other interpretability libraries (imported explicitly, never from hooked_av)."""
