"""Host sandbox policies (data) rendered to bubblewrap or sandbox-exec."""
