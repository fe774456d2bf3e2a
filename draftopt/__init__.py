"""draftopt"""
