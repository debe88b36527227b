"""Adapters: turn what medical devices send (files, DICOM, slides, network pushes) into Acquisition records."""
