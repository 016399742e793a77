"""The demo: procedural scenes and their data root, the real-photo release, the results report and the log plots of
``tools/demo.sh``; an application of the library, which never imports it."""
