"""The engine behind Source and Destination (private): session resources, worker processes, device-state reassembly and saving, progress."""
