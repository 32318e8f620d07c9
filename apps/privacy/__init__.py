"""The privacy frontier: train and audit defended settings side by side (`flglm privacy frontier`)."""
